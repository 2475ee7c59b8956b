"""The compact Llama and its training loops: arrives with issue 4."""
