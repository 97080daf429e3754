"""Fine-tuning: dataset checks, the LoRA trainer (in a worker process) and the job manager.

Only trainer.py (and worker.py's entry point) import torch; the server side imports the rest.
"""
