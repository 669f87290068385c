"""Windows: tumbling 1- and 15-minute event-time windows per meter as mergeable partials (the
engine, the partial arithmetic).
"""
