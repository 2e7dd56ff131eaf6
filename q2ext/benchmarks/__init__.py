"""Microbenchmarks shipped with q2ext (run by `q2ext bench` and the scripts in bench/)."""
