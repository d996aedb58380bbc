"""Beyond one process: moving KV between engines (kv_transfer)."""
