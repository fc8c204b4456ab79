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

output "ray_role_arn" {
  description = "Annotate the ServiceAccounts ray-head and ray-worker with eks.amazonaws.com/role-arn=<this>."
  value       = aws_iam_role.irsa["ray"].arn
}

output "mlflow_role_arn" {
  description = "Annotate the ServiceAccount mlflow with eks.amazonaws.com/role-arn=<this>."
  value       = aws_iam_role.irsa["mlflow"].arn
}

output "postgres_backup_role_arn" {
  description = "Annotate the ServiceAccount postgres-backup with eks.amazonaws.com/role-arn=<this>."
  value       = aws_iam_role.irsa["postgres-backup"].arn
}

output "image_repository" {
  description = "Push infra/Dockerfile's image here, tagged with the package version."
  value       = aws_ecr_repository.odenet.repository_url
}
