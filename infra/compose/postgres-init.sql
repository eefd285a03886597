-- One database per service: MLflow's backend store and Prefect's server.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
