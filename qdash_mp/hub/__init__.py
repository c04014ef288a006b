"""The Redis hub (issue "Scale-out"): collectors publish to Redis, one dashboard reads all hosts."""
