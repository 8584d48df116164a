"""FREUD: Feature Retrieval, Editing and Understanding for Developers.

The domain library: audio, Whisper hooks, activation shards, sparse autoencoders and the feature index.
It knows nothing of Dagster or Dash; `freud_pipeline.defs` and `dash_app` are thin layers over it.
"""

__version__ = "0.1.0"
