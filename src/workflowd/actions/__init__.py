"""Actions: retry through the broker, Slack posts and webhook calls."""
