# What runs in the cluster before k8s/ can: NetworkPolicy enforcement, storage for
# PostgreSQL (kept when its claim goes), the GPU device plugin, the cluster
# autoscaler and the KubeRay operator.

# The VPC CNI enforces NetworkPolicies (k8s/10-network-policies.yaml) only with its
# network policy agent switched on; without it they are silently ignored.
resource "aws_eks_addon" "vpc_cni" {
  cluster_name                = aws_eks_cluster.this.name
  addon_name                  = "vpc-cni"
  resolve_conflicts_on_create = "OVERWRITE"
  resolve_conflicts_on_update = "OVERWRITE"
  configuration_values = jsonencode({
    enableNetworkPolicy = "true"
  })
}

# PersistentVolumes on EBS for PostgreSQL (k8s/data/10-postgres-volume.yaml). The add-on's
# own default StorageClass deletes a volume with its claim; the one below is the
# cluster's default instead.
resource "aws_eks_addon" "ebs_csi" {
  cluster_name             = aws_eks_cluster.this.name
  addon_name               = "aws-ebs-csi-driver"
  service_account_role_arn = aws_iam_role.irsa["ebs-csi"].arn

  depends_on = [aws_eks_node_group.cpu]
}

# The default StorageClass (EKS clusters no longer come with one), which keeps the
# EBS volume when its claim is deleted: MLflow's runs survive even
# `kubectl delete -f k8s/data/` or the namespace's deletion, as a Released
# PersistentVolume to rebind or an EBS volume to snapshot. Delete such volumes
# deliberately (the README's "Tear down").
resource "kubernetes_storage_class_v1" "retained" {
  metadata {
    name = "gp3-retained"
    annotations = {
      "storageclass.kubernetes.io/is-default-class" = "true"
    }
  }

  storage_provisioner = "ebs.csi.aws.com"
  reclaim_policy      = "Retain"
  # The volume is made in the zone of the node its first pod lands on.
  volume_binding_mode    = "WaitForFirstConsumer"
  allow_volume_expansion = true
  parameters = {
    type      = "gp3"
    encrypted = "true"
  }

  depends_on = [aws_eks_addon.ebs_csi]
}

# Advertises nvidia.com/gpu on the GPU nodes. The chart's defaults tolerate the
# nvidia.com/gpu taint and select nodes labelled nvidia.com/gpu.present=true (eks.tf).
resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.nvidia_device_plugin_chart_version
  namespace  = "kube-system"

  depends_on = [aws_eks_node_group.cpu]
}

# Turns pending Ray worker pods into GPU nodes and idle nodes back into nothing.
resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.cluster_autoscaler_chart_version
  namespace  = "kube-system"

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = var.region
    autoDiscovery = { clusterName = aws_eks_cluster.this.name }
    rbac = {
      serviceAccount = {
        name        = "cluster-autoscaler"
        annotations = { "eks.amazonaws.com/role-arn" = aws_iam_role.irsa["cluster-autoscaler"].arn }
      }
    }
    extraArgs = {
      # Node groups of the same instance types stay balanced across zones.
      "balance-similar-node-groups" = true
      # A GPU node that only runs DaemonSets (device plugin) is empty.
      "skip-nodes-with-system-pods" = false
    }
  })]

  depends_on = [aws_eks_node_group.cpu, aws_iam_role_policy.cluster_autoscaler]
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_operator_chart_version
  namespace        = var.kuberay_operator_namespace
  create_namespace = true

  depends_on = [aws_eks_node_group.cpu]
}
