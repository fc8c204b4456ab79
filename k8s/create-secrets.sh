#!/bin/sh
# Creates the Secrets that the manifests in k8s/ reference by name, with random
# values; no credential is ever written into a manifest. Run it once, after
# `kubectl apply -f k8s/data/` and before `kubectl apply -f k8s/`:
#
#   sh k8s/create-secrets.sh
#
# On AWS with the bucket from infra/terraform, skip SeaweedFS's Secrets:
#
#   ODENET_OBJECT_STORE=aws sh k8s/create-secrets.sh
#
# A Secret that exists already is left alone: PostgreSQL keeps the password it was
# initialised with, so a new value would lock MLflow out. The Secrets live in the
# namespace of k8s/data/ and so outlive `kubectl delete -f k8s/`, as the data they
# open does. To rotate one, delete it, run this again and restart (or rerun) what
# reads it (PostgreSQL's password also needs an ALTER ROLE).
#
# Read a value back with e.g.
#   kubectl -n odenet get secret mlflow-admin \
#     -o jsonpath='{.data.MLFLOW_AUTH_ADMIN_PASSWORD}' | base64 -d
#
# kubectl applies only .yaml, .yml and .json files from k8s/, so this file and
# README.md in it are not applied. tests/test_k8s.py reads the Secret names and
# keys from the `create secret` commands below.
set -eu

namespace=odenet
here=$(dirname "$0")
kubectl apply -f "$here/data/00-namespace.yaml"

# Hex only: the values end up in URLs and in an ini file, where other characters
# would need escaping.
random() { openssl rand -hex "${1:-24}"; }
missing() { ! kubectl -n "$namespace" get secret "$1" >/dev/null 2>&1; }

# PostgreSQL's password for the user `mlflow` (20-postgres.yaml, 40-mlflow.yaml).
missing postgres-credentials && kubectl -n "$namespace" create secret generic postgres-credentials \
  --from-literal=POSTGRES_PASSWORD="$(random)"

# The MLflow server's admin account, created on its first start, and the key that
# signs its session cookies and CSRF tokens (40-mlflow.yaml, 41-mlflow-setup-job.yaml).
missing mlflow-admin && kubectl -n "$namespace" create secret generic mlflow-admin \
  --from-literal=MLFLOW_AUTH_ADMIN_USERNAME=admin \
  --from-literal=MLFLOW_AUTH_ADMIN_PASSWORD="$(random)" \
  --from-literal=MLFLOW_FLASK_SERVER_SECRET_KEY="$(random 32)"

# The MLflow account the Ray pods log runs as (50-raycluster.yaml), created by
# 41-mlflow-setup-job.yaml. The keys are the variables the MLflow client reads.
missing mlflow-ray-user && kubectl -n "$namespace" create secret generic mlflow-ray-user \
  --from-literal=MLFLOW_TRACKING_USERNAME=ray \
  --from-literal=MLFLOW_TRACKING_PASSWORD="$(random)"

case "${ODENET_OBJECT_STORE:-seaweedfs}" in
seaweedfs)
  # SeaweedFS's admin, used only to create the bucket (30-seaweedfs.yaml,
  # 31-seaweedfs-setup-job.yaml).
  missing seaweedfs-admin && kubectl -n "$namespace" create secret generic seaweedfs-admin \
    --from-literal=AWS_ACCESS_KEY_ID="admin$(random 8)" \
    --from-literal=AWS_SECRET_ACCESS_KEY="$(random 32)"

  # One SeaweedFS identity per workload, each writing only its own prefix of the
  # bucket `odenet` (30-seaweedfs.yaml): the Ray pods (ray-results/), MLflow
  # (mlflow-artifacts/) and the PostgreSQL backups (postgres-backups/). On AWS the
  # pods get the bucket through IAM roles bound to their ServiceAccounts instead
  # (infra/terraform/irsa.tf).
  for workload in ray mlflow backup; do
    missing "s3-$workload" && kubectl -n "$namespace" create secret generic "s3-$workload" \
      --from-literal=AWS_ACCESS_KEY_ID="$workload$(random 8)" \
      --from-literal=AWS_SECRET_ACCESS_KEY="$(random 32)"
  done
  ;;
aws) ;;
*)
  echo "ODENET_OBJECT_STORE must be seaweedfs (the default) or aws" >&2
  exit 2
  ;;
esac

kubectl -n "$namespace" get secrets
