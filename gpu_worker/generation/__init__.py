"""Token generation: the reference loop, the fast frame engine and its sampling draws."""
