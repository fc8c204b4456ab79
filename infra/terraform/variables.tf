variable "region" {
  description = "AWS region of the cluster and the bucket."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Name of the EKS cluster, and prefix of everything else this creates."
  type        = string
  default     = "odenet"
}

variable "bucket_name" {
  description = "Name of the artifact bucket (MLflow artifacts, Ray Tune's storage path). S3 names are global: pick one nobody has."
  type        = string
}

variable "api_allowed_cidrs" {
  description = "CIDR blocks allowed to reach the Kubernetes API endpoint from the internet (where kubectl, helm and ray job submit run), e.g. [\"203.0.113.7/32\"]."
  type        = list(string)

  validation {
    condition     = !contains(var.api_allowed_cidrs, "0.0.0.0/0")
    error_message = "Open the API endpoint to the addresses that need it, not to the whole internet."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.35"
}

variable "kubernetes_namespace" {
  description = "Namespace of k8s/ (00-namespace.yaml): the service accounts that get the bucket live there."
  type        = string
  default     = "odenet"
}

variable "availability_zones" {
  description = "Zones of the region to use, by letter; choose ones that offer the GPU instance types."
  type        = list(string)
  default     = ["a", "b"]

  validation {
    condition     = length(var.availability_zones) >= 2
    error_message = "EKS needs subnets in at least two availability zones."
  }
}

variable "vpc_cidr" {
  description = "Address range of the VPC."
  type        = string
  default     = "10.42.0.0/16"
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group (Ray head, MLflow, PostgreSQL, system pods)."
  type        = list(string)
  default     = ["m6i.xlarge"]
}

variable "cpu_node_count" {
  description = "Sizes of the CPU node group."
  type = object({
    min     = number
    desired = number
    max     = number
  })
  default = { min = 2, desired = 2, max = 4 }
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group; k8s/50-raycluster.yaml sizes its workers for 4 vCPU, 16 GiB, 1 GPU."
  type        = list(string)
  default     = ["g5.xlarge", "g6.xlarge"]
}

variable "gpu_accelerator" {
  description = "Value of the GPU nodes' label k8s.amazonaws.com/accelerator (the cluster autoscaler only needs the label to be there; the value names the GPU type for its --gpu-total limits). The default instance types mix A10G and L4 GPUs; name the one GPU if you use one type, e.g. nvidia-a10g."
  type        = string
  default     = "nvidia"
}

variable "gpu_node_max" {
  description = "Most GPU nodes at once. The group starts at zero and the cluster autoscaler follows the Ray autoscaler's worker pods."
  type        = number
  default     = 4
}

variable "gpu_capacity_type" {
  description = "ON_DEMAND or SPOT for the GPU nodes. Trials survive a lost spot node by resuming from their last checkpoint."
  type        = string
  default     = "ON_DEMAND"
}

variable "node_disk_gib" {
  description = "Root volume of every node; the Ray image (CUDA, PyTorch) alone is over 15 GiB."
  type        = number
  default     = 100
}

variable "checkpoint_expiration_days" {
  description = "Days after which Ray Tune's checkpoints and sweep state (prefix ray-results/) are deleted; a sweep older than that cannot be resumed."
  type        = number
  default     = 90
}

variable "noncurrent_version_expiration_days" {
  description = "Days an overwritten or deleted object version is kept before it is removed for good."
  type        = number
  default     = 30
}

variable "kuberay_operator_chart_version" {
  description = "Version of the kuberay-operator Helm chart; its CRDs must know the fields k8s/ uses (authOptions: 1.5 or later)."
  type        = string
  default     = "1.7.0"
}

variable "kuberay_operator_namespace" {
  description = "Namespace of the KubeRay operator; k8s/10-network-policies.yaml lets it, and only it, reach the Ray dashboard from outside the namespace."
  type        = string
  default     = "kuberay-system"
}

variable "nvidia_device_plugin_chart_version" {
  description = "Version of the nvidia-device-plugin Helm chart."
  type        = string
  default     = "0.17.1"
}

variable "cluster_autoscaler_chart_version" {
  description = "Version of the cluster-autoscaler Helm chart; choose one whose autoscaler matches kubernetes_version's minor version."
  type        = string
  default     = "9.53.0"
}
