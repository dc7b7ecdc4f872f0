"""ECG data: WFDB reading, preprocessing, synthetic hospitals, cached windows."""
