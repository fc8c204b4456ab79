"""The study's Ray Tune programs: they import `odenet` and add only what is about searching."""

from odenet import progress

# Before any sweep module imports Ray or MLflow, which read their log levels once, at import;
# tuning.main names a bad $ODENET_LOG_LEVEL as bad input.
progress.quiet_third_party()
