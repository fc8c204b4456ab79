# What k8s/ and the README's commands need from this configuration.

output "region" {
  description = "AWS region of the cluster and the bucket."
  value       = var.region
}

output "cluster_name" {
  description = "EKS cluster name."
  value       = aws_eks_cluster.this.name
}

output "configure_kubectl" {
  description = "Points kubectl at the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${aws_eks_cluster.this.name}"
}

output "artifact_bucket" {
  description = "The bucket for s3://BUCKET/mlflow-artifacts (k8s/40-mlflow.yaml), s3://BUCKET/ray-results (k8s/jobs/) and s3://BUCKET/postgres-backups (k8s/21-postgres-backup.yaml)."
  value       = aws_s3_bucket.artifacts.bucket
}

output "workload_role_arns" {
  description = "The IAM role of each workload, bound to its ServiceAccounts of k8s/01-service-accounts.yaml by EKS Pod Identity associations (irsa.tf): nothing to annotate."
  value       = { for identity, role in aws_iam_role.workload : identity => role.arn }
}

output "image_repository" {
  description = "Push infra/Dockerfile's image here, tagged with the package version."
  value       = aws_ecr_repository.odenet.repository_url
}
