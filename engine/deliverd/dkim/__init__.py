"""DKIM: signing keys read from the files ``dkim[]`` names, and the signatures made with them."""
