"""The one resumable, sharded run engine (runs.py) and the manifests that keep runs apart
(manifest.py). The jobs above (gdiff/jobs/) supply their own computation and output format;
the engine imports only the library and the foundation below it."""
