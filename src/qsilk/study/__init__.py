"""``qsilk study``: methods x steps x CFG (x scheduler) on paired seeds, resumable, with paired-bootstrap CIs and an
HTML report. See docs/study.md."""
