# One key for what this configuration encrypts at rest: the bucket, Kubernetes
# Secrets in etcd, the image repository and the flow log.

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A key policy: its resource "*" is this one key, and the account-root statement is AWS's default key policy, which hands control to IAM.
  #checkov:skip=CKV_AWS_111:A key policy: its resource "*" is this one key, and the account-root statement is AWS's default key policy, which hands control to IAM.
  #checkov:skip=CKV_AWS_356:A key policy: its resource "*" is this one key; the CloudWatch Logs statement is further limited to this configuration's log groups.
  # The account administers the key through IAM, as with AWS's default key policy;
  # the roles below get what they need through their own policies.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy, "*" is this key
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsEncryptsTheFlowLog"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${data.aws_partition.current.partition}:logs:${var.region}:${data.aws_caller_identity.current.account_id}:log-group:/aws/vpc/${var.name}/*"]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = "${var.name}: artifact bucket, EKS secrets, image repository, flow log"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}
