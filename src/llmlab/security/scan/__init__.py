"""`llmlab scan`: probes, detectors, defences and reports for prompt injection and jailbreaks, against an
llmlab run or any OpenAI-compatible endpoint (the garak probe/detector split, offline and small)."""
