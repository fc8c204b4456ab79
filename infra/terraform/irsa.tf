# IAM roles for service accounts: pods sign AWS requests as the role their
# ServiceAccount is annotated with, so no AWS key is ever stored in the cluster.

resource "aws_iam_openid_connect_provider" "eks" {
  url            = aws_eks_cluster.this.identity[0].oidc[0].issuer
  client_id_list = ["sts.amazonaws.com"]
}

locals {
  oidc_issuer = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")

  # Who may assume which role: ServiceAccounts of k8s/01-service-accounts.yaml,
  # and of the add-ons in addons.tf.
  irsa_subjects = {
    # Tune's driver on the head and the trials on the workers write the sweep's
    # state and checkpoints.
    ray = [
      "system:serviceaccount:${var.kubernetes_namespace}:ray-head",
      "system:serviceaccount:${var.kubernetes_namespace}:ray-worker",
    ]
    # The tracking server's artifact proxy.
    mlflow = ["system:serviceaccount:${var.kubernetes_namespace}:mlflow"]
    # PostgreSQL's nightly dumps (k8s/21-postgres-backup.yaml) and their restore
    # (k8s/restore/).
    postgres-backup    = ["system:serviceaccount:${var.kubernetes_namespace}:postgres-backup"]
    cluster-autoscaler = ["system:serviceaccount:kube-system:cluster-autoscaler"]
    ebs-csi            = ["system:serviceaccount:kube-system:ebs-csi-controller-sa"]
  }

  # The bucket prefix each workload owns.
  bucket_prefixes = {
    ray             = "ray-results"
    mlflow          = "mlflow-artifacts"
    postgres-backup = "postgres-backups"
  }
}

data "aws_iam_policy_document" "irsa_assume" {
  for_each = local.irsa_subjects

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.eks.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = each.value
    }
  }
}

resource "aws_iam_role" "irsa" {
  for_each = local.irsa_subjects

  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume[each.key].json
}

# Ray, MLflow and the backups: this bucket only, and within it their own prefix for
# objects.
data "aws_iam_policy_document" "bucket_access" {
  for_each = local.bucket_prefixes

  statement {
    sid       = "FindTheBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid = "OwnPrefix"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.artifacts.arn}/${each.value}/*"]
  }

  # Objects are encrypted with the configuration's key (bucket.tf).
  statement {
    sid       = "UseTheBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.this.arn]
  }
}

resource "aws_iam_role_policy" "bucket_access" {
  for_each = local.bucket_prefixes

  name   = "artifact-bucket"
  role   = aws_iam_role.irsa[each.key].id
  policy = data.aws_iam_policy_document.bucket_access[each.key].json
}

# The cluster autoscaler: read every group, resize only this cluster's groups.
data "aws_iam_policy_document" "cluster_autoscaler" {
  statement {
    #checkov:skip=CKV_AWS_356:Describe and Get actions of Auto Scaling and EC2 cannot be limited to resources; the autoscaler must see the groups to find its own.
    sid = "Discover"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeAutoScalingInstances",
      "autoscaling:DescribeLaunchConfigurations",
      "autoscaling:DescribeScalingActivities",
      "autoscaling:DescribeTags",
      "ec2:DescribeImages",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:GetInstanceTypesFromInstanceRequirements",
    ]
    resources = ["*"]
  }

  # Labels and taints of a group with no node yet: how it knows the GPU group can
  # take a pod that tolerates nvidia.com/gpu.
  statement {
    sid       = "ReadNodeGroups"
    actions   = ["eks:DescribeNodegroup"]
    resources = [aws_eks_node_group.cpu.arn, aws_eks_node_group.gpu.arn]
  }

  statement {
    sid = "ResizeOwnGroups"
    actions = [
      "autoscaling:SetDesiredCapacity",
      "autoscaling:TerminateInstanceInAutoScalingGroup",
    ]
    resources = ["*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/k8s.io/cluster-autoscaler/${aws_eks_cluster.this.name}"
      values   = ["owned"]
    }
  }
}

resource "aws_iam_role_policy" "cluster_autoscaler" {
  name   = "cluster-autoscaler"
  role   = aws_iam_role.irsa["cluster-autoscaler"].id
  policy = data.aws_iam_policy_document.cluster_autoscaler.json
}

resource "aws_iam_role_policy_attachment" "ebs_csi" {
  role       = aws_iam_role.irsa["ebs-csi"].name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy"
}
