"""The pipeline layer below the web tier: the chain of stage messages and the attempt bookkeeping."""
