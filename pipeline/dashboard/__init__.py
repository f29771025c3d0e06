"""The operations dashboard: what flows, what is stuck, what is late, with need-to-know
access (R28, R29). `create_dashboard(app)` builds the Flask app; `privacy dashboard`
serves it."""
