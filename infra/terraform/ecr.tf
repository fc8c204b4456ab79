# Where infra/Dockerfile's image goes: k8s/50-raycluster.yaml and k8s/jobs/
# name it (output image_repository).
resource "aws_ecr_repository" "odenet" {
  name = var.name
  # A tag is a package version: once pushed it never changes meaning.
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.this.arn
  }
}

resource "aws_ecr_lifecycle_policy" "odenet" {
  repository = aws_ecr_repository.odenet.name
  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Keep the 20 newest images"
      selection = {
        tagStatus   = "any"
        countType   = "imageCountMoreThan"
        countNumber = 20
      }
      action = { type = "expire" }
    }]
  })
}
