# The way out to S3 for the pods of k8s/ that use the bucket.
#
# k8s/10-network-policies.yaml closes egress by default and lets each workload reach
# only what it needs in the cluster, SeaweedFS included. On AWS the bucket is S3,
# outside the cluster: its pods also need the addresses of S3 in this region, which
# only AWS knows and which it changes now and then, and the EKS Pod Identity agent
# that hands them their roles' credentials (irsa.tf). So the policies that add both
# live here, where the S3 prefix list can be read, and `terraform apply` refreshes
# them when AWS adds a range.
#
# Their namespace is made here too, as k8s/data/00-namespace.yaml describes it, so
# that the policies can exist before `kubectl apply -f k8s/data/`, which then finds
# the namespace as it would have made it. A deliberate `kubectl delete -f k8s/data/`
# deletes the namespace and these policies with it: `terraform apply` brings them back.

locals {
  namespace_manifest = yamldecode(file("${path.module}/../../k8s/data/00-namespace.yaml"))

  # The NetworkPolicies of k8s/10-network-policies.yaml, by name.
  k8s_network_policies = {
    for document in split("\n---\n", file("${path.module}/../../k8s/10-network-policies.yaml")) :
    yamldecode(document).metadata.name => yamldecode(document)
  }

  # Each policy made here, and the policy of k8s/ whose pods it lets out to S3: the
  # same pods, by the same selector. MLflow (its artifact proxy and its pre-upgrade
  # dumps), the PostgreSQL backups and restore, and the Ray pods (Tune's storage
  # path): the pods whose ServiceAccounts irsa.tf binds to a role.
  bucket_egress = {
    mlflow-to-s3  = "mlflow-out"
    backups-to-s3 = "backups-out"
    ray-to-s3     = "ray-out"
  }

  # Where the Pod Identity agent answers on every node (its IPv6 address,
  # fd00:ec2::23, serves IPv6 clusters only; this one is IPv4).
  pod_identity_agent = "169.254.170.23/32"
}

# The addresses the VPC's S3 gateway endpoint routes (network.tf): S3 of this region.
data "aws_ec2_managed_prefix_list" "s3" {
  id = aws_vpc_endpoint.s3.prefix_list_id
}

resource "kubernetes_namespace_v1" "workloads" {
  metadata {
    name   = var.kubernetes_namespace
    labels = local.namespace_manifest.metadata.labels
  }

  lifecycle {
    precondition {
      condition     = local.namespace_manifest.metadata.name == var.kubernetes_namespace
      error_message = "var.kubernetes_namespace must be the namespace of k8s/data/00-namespace.yaml."
    }
  }

  # Deleted before the nodes go, while its pods can still stop.
  depends_on = [aws_eks_node_group.cpu]
}

resource "kubernetes_network_policy_v1" "bucket" {
  for_each = local.bucket_egress

  metadata {
    name      = each.key
    namespace = kubernetes_namespace_v1.workloads.metadata[0].name
    labels = {
      "app.kubernetes.io/part-of"    = "odenet"
      "app.kubernetes.io/managed-by" = "terraform"
    }
  }

  spec {
    pod_selector {
      match_labels = lookup(local.k8s_network_policies[each.value].spec.podSelector, "matchLabels", null)
      dynamic "match_expressions" {
        for_each = lookup(local.k8s_network_policies[each.value].spec.podSelector, "matchExpressions", [])
        content {
          key      = match_expressions.value.key
          operator = match_expressions.value.operator
          values   = match_expressions.value.values
        }
      }
    }

    policy_types = ["Egress"]

    # S3, over HTTPS only.
    egress {
      dynamic "to" {
        for_each = data.aws_ec2_managed_prefix_list.s3.entries
        content {
          ip_block {
            cidr = to.value.cidr
          }
        }
      }
      ports {
        protocol = "TCP"
        port     = "443"
      }
    }

    # The role's credentials.
    egress {
      to {
        ip_block {
          cidr = local.pod_identity_agent
        }
      }
      ports {
        protocol = "TCP"
        port     = "80"
      }
    }
  }

  lifecycle {
    # A rule without destinations lets a pod out to every address.
    precondition {
      condition     = length(data.aws_ec2_managed_prefix_list.s3.entries) > 0
      error_message = "The S3 prefix list has no entries: the rule to S3 would allow port 443 everywhere."
    }
  }
}
