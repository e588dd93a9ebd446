"""Training: plan a batch into jobs (plan.py), the per-worker training loop (train_loop.py, plain
torch + PEFT), the Ray Train wiring (launch.py) and the batch orchestrator (orchestrate.py)."""
