"""Publish: what goes back to Kafka (closed-window aggregates, alerts, dead letters, regional
aggregates) and the output topics.
"""
