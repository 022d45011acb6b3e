"""Labs beside security/: experiments on what a model says (truthfulness), one folder per lab."""
