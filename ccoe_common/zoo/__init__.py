"""The demo model zoo: a small backbone pre-trained on synthetic domains, one expert per domain
trained with the backbone frozen, a rule table, and the reproduction of the papers' claims."""
