# The AWS identities of the pods, so that no AWS key is ever stored in the cluster.
#
# The workloads of k8s/ (Ray, MLflow, the PostgreSQL backups) get theirs through EKS
# Pod Identity: Terraform binds each role to its ServiceAccount with an association
# held by EKS, not by an annotation on the ServiceAccount, so `kubectl delete -f k8s/`
# and a re-apply (the README's restore path) recreate the ServiceAccounts and keep S3.
# The add-ons below (cluster autoscaler, EBS CSI driver) keep IAM roles for service
# accounts, which their charts and add-on configure themselves.

resource "aws_iam_openid_connect_provider" "eks" {
  url            = aws_eks_cluster.this.identity[0].oidc[0].issuer
  client_id_list = ["sts.amazonaws.com"]
}

locals {
  oidc_issuer = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")

  # Who may assume which add-on role.
  irsa_subjects = {
    cluster-autoscaler = ["system:serviceaccount:kube-system:cluster-autoscaler"]
    ebs-csi            = ["system:serviceaccount:kube-system:ebs-csi-controller-sa"]
  }

  # Each workload's S3 identity: the ServiceAccounts of k8s/01-service-accounts.yaml
  # bound to it, the bucket prefixes it reads and writes (and so deletes in), and the
  # prefixes it may only add to. The same split as SeaweedFS's identities
  # (k8s/30-seaweedfs.yaml): the Ray role, which submitted code holds, can neither
  # read nor delete a backup or an artifact.
  workload_identities = {
    # Tune's driver on the head and the trials on the workers: the sweep's state
    # and checkpoints.
    ray = {
      service_accounts = ["ray-head", "ray-worker"]
      own_prefixes     = ["ray-results"]
      add_only         = []
    }
    # The tracking server's artifact proxy, and the dump it takes before migrating
    # its schema (k8s/40-mlflow.yaml).
    mlflow = {
      service_accounts = ["mlflow"]
      own_prefixes     = ["mlflow-artifacts"]
      add_only         = ["postgres-backups/before-upgrade"]
    }
    # PostgreSQL's nightly dumps (k8s/21-postgres-backup.yaml), their pruning and
    # their restore (k8s/restore/).
    postgres-backup = {
      service_accounts = ["postgres-backup"]
      own_prefixes     = ["postgres-backups"]
      add_only         = []
    }
  }

  pod_identity_associations = merge([
    for identity, spec in local.workload_identities : {
      for account in spec.service_accounts : account => identity
    }
  ]...)
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

# EKS Pod Identity: the agent on each node hands pods the credentials of the role
# associated with their ServiceAccount.
resource "aws_eks_addon" "pod_identity_agent" {
  cluster_name = aws_eks_cluster.this.name
  addon_name   = "eks-pod-identity-agent"

  depends_on = [aws_eks_node_group.cpu]
}

data "aws_iam_policy_document" "pod_identity_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }
    # Only this cluster's associations may hand the role out.
    condition {
      test     = "StringEquals"
      variable = "aws:SourceArn"
      values   = [aws_eks_cluster.this.arn]
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each = local.workload_identities

  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.pod_identity_assume.json
}

resource "aws_eks_pod_identity_association" "workload" {
  for_each = local.pod_identity_associations

  cluster_name    = aws_eks_cluster.this.name
  namespace       = var.kubernetes_namespace
  service_account = each.key
  role_arn        = aws_iam_role.workload[each.value].arn
}

# This bucket only; within it, objects of the workload's own prefixes, and new
# objects under its add-only prefixes. Listing names (and HeadBucket, which pyarrow
# sends before Tune's uploads) needs s3:ListBucket on the bucket.
data "aws_iam_policy_document" "bucket_access" {
  for_each = local.workload_identities

  statement {
    sid       = "FindTheBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid = "OwnPrefixes"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [for prefix in each.value.own_prefixes : "${aws_s3_bucket.artifacts.arn}/${prefix}/*"]
  }

  dynamic "statement" {
    for_each = length(each.value.add_only) > 0 ? [each.value.add_only] : []
    content {
      sid       = "AddOnly"
      actions   = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
      resources = [for prefix in statement.value : "${aws_s3_bucket.artifacts.arn}/${prefix}/*"]
    }
  }

  # Objects are encrypted with the configuration's key (bucket.tf).
  statement {
    sid       = "UseTheBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.this.arn]
  }
}

resource "aws_iam_role_policy" "bucket_access" {
  for_each = local.workload_identities

  name   = "artifact-bucket"
  role   = aws_iam_role.workload[each.key].id
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
