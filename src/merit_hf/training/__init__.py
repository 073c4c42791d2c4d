"""Training jobs of merit_hf: one Accelerate script per job (`pretrain`, probing / fine-tuning, report LoRA), each a
`main(argv) -> dict` whose arguments are dataclasses read from a YAML file or flags."""
