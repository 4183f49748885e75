"""vLLM integration: ``kvbm.vllm_integration.connector.DynamoConnector`` (a KVConnectorBase_V1)."""
