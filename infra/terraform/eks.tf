# The EKS cluster: control plane, a CPU node group for the long-running pods and a
# tainted GPU node group that starts empty and grows with the Ray workers.

data "aws_iam_policy_document" "cluster_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["eks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "cluster" {
  name               = "${var.name}-cluster"
  assume_role_policy = data.aws_iam_policy_document.cluster_assume.json
}

resource "aws_iam_role_policy_attachment" "cluster" {
  role       = aws_iam_role.cluster.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonEKSClusterPolicy"
}

resource "aws_eks_cluster" "this" {
  #checkov:skip=CKV_AWS_38:public_access_cidrs is var.api_allowed_cidrs, which has no default and whose validation rejects 0.0.0.0/0; checkov cannot see a variable's value.
  #checkov:skip=CKV_AWS_39:The public endpoint is how kubectl, helm and `ray job submit` (through port-forward) reach the cluster without a VPN; it is open only to var.api_allowed_cidrs.
  name     = var.name
  version  = var.kubernetes_version
  role_arn = aws_iam_role.cluster.arn

  vpc_config {
    subnet_ids              = aws_subnet.private[*].id
    endpoint_private_access = true
    endpoint_public_access  = true
    public_access_cidrs     = var.api_allowed_cidrs
  }

  # Access entries instead of the aws-auth ConfigMap; whoever runs terraform
  # becomes cluster admin (the helm provider needs it).
  access_config {
    authentication_mode                         = "API"
    bootstrap_cluster_creator_admin_permissions = true
  }

  encryption_config {
    resources = ["secrets"]
    provider {
      key_arn = aws_kms_key.this.arn
    }
  }

  enabled_cluster_log_types = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  depends_on = [aws_iam_role_policy_attachment.cluster]
}

# --- Nodes -------------------------------------------------------------------------

data "aws_iam_policy_document" "node_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = "${var.name}-node"
  assume_role_policy = data.aws_iam_policy_document.node_assume.json
}

resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
  ])

  role       = aws_iam_role.node.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/${each.value}"
}

# Shared by both node groups: an encrypted root volume large enough for the image,
# and instance metadata that pods cannot reach (one hop), so they use the IAM roles
# of their service accounts and never the node's.
resource "aws_launch_template" "node" {
  name_prefix = "${var.name}-node-"

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = var.node_disk_gib
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tag_specifications {
    resource_type = "instance"
    tags = {
      Name = "${var.name}-node"
    }
  }
}

resource "aws_eks_node_group" "cpu" {
  cluster_name    = aws_eks_cluster.this.name
  node_group_name = "cpu"
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = aws_subnet.private[*].id
  ami_type        = "AL2023_x86_64_STANDARD"
  instance_types  = var.cpu_instance_types

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  scaling_config {
    min_size     = var.cpu_node_count.min
    desired_size = var.cpu_node_count.desired
    max_size     = var.cpu_node_count.max
  }

  labels = {
    "odenet/node-kind" = "cpu"
  }

  lifecycle {
    # The cluster autoscaler owns the size once the group exists.
    ignore_changes = [scaling_config[0].desired_size]

    # PostgreSQL's and SeaweedFS's volumes are EBS volumes, each in one zone, and
    # their pods can only run there. The Auto Scaling group spreads its nodes evenly
    # across the zones, so a minimum of one node per zone keeps a node in the
    # volumes' zone whichever node is replaced.
    precondition {
      condition     = var.cpu_node_count.min >= length(var.availability_zones)
      error_message = "cpu_node_count.min must be at least the number of availability_zones: a zonal volume needs a CPU node in its zone."
    }
  }

  depends_on = [aws_iam_role_policy_attachment.node, aws_eks_addon.vpc_cni]
}

locals {
  # The GPU group's node labels, also tagged onto its Auto Scaling group below.
  gpu_node_labels = {
    "odenet/node-kind" = "gpu"
    # The NVIDIA device plugin's chart runs only on nodes that say they have a GPU.
    "nvidia.com/gpu.present" = "true"
    # The label the cluster autoscaler (AWS) knows GPU nodes by: a node that has it
    # but does not yet advertise nvidia.com/gpu (the device plugin is still
    # starting) counts as not ready yet, instead of as a node without a GPU for
    # which it would add another. The value names the GPU type for --gpu-total
    # limits, which this setup does not set.
    "k8s.amazonaws.com/accelerator" = var.gpu_accelerator
  }
}

resource "aws_eks_node_group" "gpu" {
  cluster_name    = aws_eks_cluster.this.name
  node_group_name = "gpu"
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = aws_subnet.private[*].id
  # Amazon Linux 2023 with the NVIDIA driver and container toolkit; the device
  # plugin that advertises nvidia.com/gpu comes from addons.tf.
  ami_type       = "AL2023_x86_64_NVIDIA"
  instance_types = var.gpu_instance_types
  capacity_type  = var.gpu_capacity_type

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  # From zero: the Ray autoscaler creates a worker pod, it stays pending, the
  # cluster autoscaler adds a node; idle workers go, then their nodes.
  scaling_config {
    min_size     = 0
    desired_size = 0
    max_size     = var.gpu_node_max
  }

  labels = local.gpu_node_labels

  # Only pods that tolerate this land here: the Ray GPU workers
  # (k8s/50-raycluster.yaml) and the device plugin.
  taint {
    key    = "nvidia.com/gpu"
    value  = "true"
    effect = "NO_SCHEDULE"
  }

  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.node, aws_eks_addon.vpc_cni]
}

# Scale from zero: while the GPU group has no node, the cluster autoscaler builds its
# idea of one from the instance type and these tags of the group's Auto Scaling
# group (EKS does not copy a node group's labels and taints there), so it knows that
# a pending Ray worker, which tolerates the taint, would fit, and that the node
# will be a GPU node.
resource "aws_autoscaling_group_tag" "gpu_node_template" {
  for_each = merge(
    { for label, value in local.gpu_node_labels : "k8s.io/cluster-autoscaler/node-template/label/${label}" => value },
    { "k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu" = "true:NoSchedule" },
  )

  autoscaling_group_name = aws_eks_node_group.gpu.resources[0].autoscaling_groups[0].name

  tag {
    key                 = each.key
    value               = each.value
    propagate_at_launch = false
  }
}
