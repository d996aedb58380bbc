"""Disaggregated prefill: KV connectors (vLLM's kv_transfer_config). See factory.py and base.py."""
