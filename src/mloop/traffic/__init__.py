"""The inference log and its labels: the contract between serving and monitoring.

The server appends every answered row (:mod:`mloop.traffic.inference_log`) and stores late
ground truth by request id (:mod:`mloop.traffic.labels`); monitoring and the loop read both.
What cannot stay in the log is set aside beside it (:mod:`mloop.traffic.quarantine`), and
rows can be taken out on purpose and put back (:mod:`mloop.traffic.purge`). Nothing here
imports the server or monitoring: both build on this package.
"""
