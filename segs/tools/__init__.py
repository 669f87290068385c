"""Tooling around the service, not on its data path: the simulator and throwaway local servers."""
