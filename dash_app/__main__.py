from dash_app import main
from freud_pipeline.objectstore import configure_environment

configure_environment()  # the S3 endpoint under the names boto3, MLflow and LanceDB read
raise SystemExit(main())
