"""The offloading runtime (OPT, Llama, Mistral, Qwen2/2.5, Qwen3). Knows nothing of HELM, suites or reports."""
