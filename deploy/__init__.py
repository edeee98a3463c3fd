"""Deployment files of Sluice: compose/nginx/prometheus configs, validate.sh, and fleet.py (the container-free topology)."""
