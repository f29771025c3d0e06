"""The domain of Allego's privacy-request pipeline: requests, stages, policy and adapters.

`pipeline` never imports `workers`: actors call into it, never the other way round.
"""
