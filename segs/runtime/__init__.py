"""Runtime: the worker process (consume, process, checkpoint) and the supervisor that runs N of
them.
"""
