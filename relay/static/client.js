export class Relay {}
