# The artifact bucket: MLflow's artifacts under mlflow-artifacts/, Ray Tune's sweep
# state and checkpoints under ray-results/, PostgreSQL's dumps under
# postgres-backups/ (the paths in k8s/40-mlflow.yaml, k8s/jobs/ and
# k8s/21-postgres-backup.yaml). It lives outside the cluster: everything here
# survives the cluster's deletion.

resource "aws_s3_bucket" "artifacts" {
  #checkov:skip=CKV_AWS_18:Server access logs would need a second bucket to receive them; only the Ray and MLflow roles of irsa.tf use the bucket, and CloudTrail data events are the audit trail when one is needed.
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage for data that is reproducible: a lost checkpoint costs a rerun of that trial, not results.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; notifications would have no subscriber.
  bucket = var.bucket_name
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    # One data key per bucket instead of one KMS call per object: checkpoints are
    # many small objects.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

data "aws_iam_policy_document" "artifacts_tls_only" {
  statement {
    sid       = "DenyPlainHttp"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  policy = data.aws_iam_policy_document.artifacts_tls_only.json

  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  # Old sweeps' checkpoints: Tune rewrites them every epoch, so versioning would
  # otherwise keep every one of them forever.
  rule {
    id     = "expire-old-checkpoints"
    status = "Enabled"

    filter {
      prefix = "ray-results/"
    }

    expiration {
      days = var.checkpoint_expiration_days
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }

  # MLflow's artifacts are the results: kept, but not their overwritten versions.
  rule {
    id     = "expire-overwritten-artifacts"
    status = "Enabled"

    filter {
      prefix = "mlflow-artifacts/"
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }

  # PostgreSQL's dumps: the backup Job keeps the newest ones itself; the versions it
  # prunes stay restorable this long.
  rule {
    id     = "expire-pruned-backups"
    status = "Enabled"

    filter {
      prefix = "postgres-backups/"
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.artifacts]
}
