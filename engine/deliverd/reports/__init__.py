"""Reports the engine sends about mail: RFC 3464 delivery status notifications."""
