terraform {
  required_version = ">= 1.6"

  # Major versions pinned here; the exact versions `terraform init` picks are
  # recorded in .terraform.lock.hcl, which belongs in git once created.
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.38"
    }
  }
}
