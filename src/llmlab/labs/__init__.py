"""Labs beside security/: what a model says and how it was shaped (truthfulness, bias, ...), one folder per lab."""
