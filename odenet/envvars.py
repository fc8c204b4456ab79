"""Every environment variable the project reads, in one place.

The Kubernetes manifests are checked against these tuples: whatever the code reads
for tracking and storage must be set for the Ray pods.
"""

# MLflow's own variables: the client reads them, we only check they are coherent.
TRACKING = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)

# How long the end of a run waits for the tracking server or the store to come back.
TRACKING_RETRY_S = "ODENET_TRACKING_RETRY_S"

# S3 for Ray Tune's storage path (sweep state, trial checkpoints). The endpoint is
# only set for S3-compatible stores (SeaweedFS); on AWS it stays unset and the
# credentials come from the pod's IAM role instead of keys.
STORAGE = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)

# Where data sets live; a folder of FashionMNIST's IDX .gz files for offline machines.
DATA_DIR = "ODENET_DATA_DIR"
FASHION_MNIST_IDX = "ODENET_FASHION_MNIST_IDX"
DATA = (DATA_DIR, FASHION_MNIST_IDX)

# Credentials: never copied into Ray's job metadata (a runtime environment, which anyone who
# can list jobs on the dashboard reads). Workers get them from their own environment: the
# pods' Secrets on Kubernetes, the environment `ray start` (or the driver's local Ray) ran in.
SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN")

# Where a sweep submitted with `ray job submit` keeps what must outlast the job (the
# embedded MLflow store, the sweep state) on the machine that runs its driver; default ~/odenet.
HOME = "ODENET_HOME"
