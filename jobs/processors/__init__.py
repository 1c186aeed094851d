"""Data processors shipped with the scheduler: one module each, registered in executors/data_processing.py."""
