"""The model layer of merit_hf: `merit/` (the Hub remote-code files of MERIT) and `wfdb_io` (reading WFDB records
into the input contract). Nothing here imports the data, evaluation, training or app layers."""
