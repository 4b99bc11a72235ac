"""Benchmark decontamination of training data (Phi-4 report App. B.1): ``ngrams`` hashes
word n-grams, ``index`` holds the benchmarks and classifies documents, ``run`` scales it over
files, workers and SLURM array tasks; ``tools/decontaminate.py`` is the command."""
