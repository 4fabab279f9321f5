"""One model over several processes (GPUs or hosts): pipeline stages over torch.distributed.

`comm` (process group, messages, errors) · `split` (which layers each stage holds) ·
`stage_run` (one stage's block schedule) · `engine` (`DistributedEngine`, what
`Engine.from_pretrained(..., distributed=True)` returns)."""
