"""The native resumer format: a JSON manifest committed last over safetensors data files."""
