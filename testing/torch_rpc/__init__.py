"""Runs PyTorch's own RPC test classes against Tether and against PyTorch (tools/torch-rpc-tests)."""
