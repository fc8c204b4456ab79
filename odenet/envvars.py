"""Every environment variable the project reads, in one place.

The Kubernetes manifests are checked against these tuples: whatever the code reads
for tracking and storage must be set for the Ray pods.
"""

# MLflow's own variables: the client reads them, we only check they are coherent.
TRACKING_URI = "MLFLOW_TRACKING_URI"
TRACKING_USERNAME = "MLFLOW_TRACKING_USERNAME"
TRACKING_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
TRACKING = (TRACKING_URI, TRACKING_USERNAME, TRACKING_PASSWORD)

# How long the start or the end of a run waits for the tracking server or the store to come back.
TRACKING_RETRY_S = "ODENET_TRACKING_RETRY_S"
# MLflow's own retries and timeout per HTTP call (read at every call); the tracker sets them from
# TRACKING_RETRY_S unless the user did, so that its budget bounds the whole wait.
MLFLOW_HTTP_MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
MLFLOW_HTTP_BACKOFF_FACTOR = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
MLFLOW_HTTP_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
# Off in the processes the tests start (MLflow's clients and servers report usage otherwise).
MLFLOW_TELEMETRY_OFF = "MLFLOW_DISABLE_TELEMETRY"

# S3 for Ray Tune's storage path (sweep state, trial checkpoints). The endpoint is
# only set for S3-compatible stores (SeaweedFS); on AWS it stays unset and the
# credentials come from the pod's IAM role instead of keys.
S3_ENDPOINT = "AWS_ENDPOINT_URL"
ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
REGION = "AWS_DEFAULT_REGION"
STORAGE = (S3_ENDPOINT, ACCESS_KEY_ID, SECRET_ACCESS_KEY, REGION)
# The other names S3 clients take the endpoint and region from, read when the ones above are unset.
MLFLOW_S3_ENDPOINT = "MLFLOW_S3_ENDPOINT_URL"
AWS_REGION = "AWS_REGION"

# Where data sets live; a folder of FashionMNIST's IDX .gz files for offline machines.
DATA_DIR = "ODENET_DATA_DIR"
FASHION_MNIST_IDX = "ODENET_FASHION_MNIST_IDX"
DATA = (DATA_DIR, FASHION_MNIST_IDX)

# Credentials: never copied into Ray's job metadata (a runtime environment, which anyone who
# can list jobs on the dashboard reads). Workers get them from their own environment: the
# pods' Secrets on Kubernetes, the environment `ray start` (or the driver's local Ray) ran in.
SECRETS = (TRACKING_PASSWORD, "MLFLOW_TRACKING_TOKEN", ACCESS_KEY_ID, SECRET_ACCESS_KEY, "AWS_SESSION_TOKEN")

# What a sweep's driver hands every Ray worker from its own environment, less SECRETS.
FOR_WORKERS = (*TRACKING, *STORAGE, *DATA, MLFLOW_S3_ENDPOINT)

# Where a sweep submitted with `ray job submit` keeps what must outlast the job (the
# embedded MLflow store, the sweep state) on the machine that runs its driver; default ~/odenet.
HOME = "ODENET_HOME"

# The code's commit where the package is not a git checkout (the cluster image).
GIT_COMMIT = "ODENET_GIT_COMMIT"

# Ray's: the cluster a driver or `ray job submit` talks to; what Ray sets for the driver of a
# submitted job; and the progress output a sweep picks (set, unless the user set it).
RAY_ADDRESS = "RAY_ADDRESS"
RAY_API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RAY_AIR_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"

# The local tracking stack's admin account (infra/local); its S3 keys are ACCESS_KEY_ID and
# SECRET_ACCESS_KEY. Made up by the stack when unset.
STACK_ADMIN_USERNAME = "MLFLOW_AUTH_ADMIN_USERNAME"
STACK_ADMIN_PASSWORD = "MLFLOW_AUTH_ADMIN_PASSWORD"

# What a user sees while a run works (odenet/progress.py): PROGRESS is auto (bars on a
# terminal, one line per phase elsewhere), bars, lines or off (a sweep's trials: Tune's table
# is the view there); LOG_LEVEL is the level of MLflow's, alembic's and Ray's own logs on the
# terminal (default WARNING; `odenet --verbose` is INFO).
PROGRESS = "ODENET_PROGRESS"
LOG_LEVEL = "ODENET_LOG_LEVEL"
# The libraries' own level variables, set from LOG_LEVEL before they are imported (and so
# handed on to Ray's workers), unless the user set them.
MLFLOW_LOGGING_LEVEL = "MLFLOW_LOGGING_LEVEL"
RAY_LOGGER_LEVEL = "RAY_LOGGER_LEVEL"
# MLflow's own bar for artifact downloads and uploads: off unless verbose (it draws carriage
# returns into pipes and Ray's logs, and our phases have their own progress).
MLFLOW_ARTIFACTS_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
